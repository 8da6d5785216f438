import numpy as np
import pytest
import torch

from freqmerge.models.lfgm import (
    LFGM,
    highpass_mask,
    lfgm_from_channel_mean,
    lfgm_from_pixels,
    lfgm_scores,
)


def numpy_reference(tokens: np.ndarray, grid, radius):
    """The guide's 7 steps with a full complex FFT and an explicit wrap-around disc (independent of the rfft path)."""
    h, w = grid
    f = tokens.reshape(tokens.shape[0], h, w, -1).mean(-1)
    spec = np.fft.fft2(f, norm="ortho")
    ky = np.fft.fftfreq(h) * h
    kx = np.fft.fftfreq(w) * w
    spec = spec * ((ky[:, None] ** 2 + kx[None, :] ** 2) > radius**2)
    hp = np.fft.ifft2(spec, norm="ortho").real
    e = (hp**2).reshape(len(f), -1)
    lo, hi = e.min(1, keepdims=True), e.max(1, keepdims=True)
    return (e - lo) / (hi - lo + 1e-6)


def test_matches_independent_reference_and_range():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 196, 24, generator=g)
    phi = lfgm_scores(tokens, (14, 14), 2)
    assert phi.shape == (3, 196)
    np.testing.assert_allclose(phi.numpy(), numpy_reference(tokens.numpy(), (14, 14), 2), atol=1e-5)
    assert float(phi.min()) >= 0.0 and float(phi.max()) <= 1.0
    torch.testing.assert_close(phi.amin(1), torch.zeros(3))
    torch.testing.assert_close(phi.amax(1), torch.ones(3), atol=1e-4, rtol=0)


def test_highpass_disc_wraps_around_dc():
    mask = highpass_mask(14, 14, 2)
    assert mask.shape == (14, 8)
    zeroed = {(int(y), int(x)) for y, x in (mask == 0).nonzero()}
    # ky in {0, +-1, +-2} (rows 0, 1, 2, 13, 12), kx in {0, 1, 2} with ky^2 + kx^2 <= 4
    expected = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (13, 0), (13, 1), (2, 0), (12, 0)}
    assert zeroed == expected
    assert highpass_mask(14, 14, 0).eq(0).sum() == 1  # only DC


def test_zero_parameters_and_module_form():
    module = LFGM((14, 14), 2)
    assert sum(p.numel() for p in module.parameters()) == 0
    assert len(list(module.buffers())) == 0
    x = torch.randn(2, 196, 8)
    torch.testing.assert_close(module(x), lfgm_scores(x, (14, 14), 2))


def test_channel_mean_commutes():
    x = torch.randn(2, 196, 16)
    torch.testing.assert_close(lfgm_scores(x, (14, 14)), lfgm_from_channel_mean(x.mean(-1), (14, 14)))


def test_smooth_inputs_score_zero():
    const = torch.full((1, 196, 4), 3.0)
    assert lfgm_scores(const, (14, 14)).abs().max() < 1e-6
    yy, xx = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    low = torch.cos(2 * torch.pi * (yy + xx) / 14)  # frequency (1, 1), inside the radius-2 disc
    assert lfgm_from_channel_mean(low.reshape(1, -1), (14, 14)).abs().max() < 1e-4


def test_bar_edges_score_highest():
    # A bright vertical bar over patch columns 6-7 (no edge at the image border, where the FFT wraps around).
    img = torch.zeros(1, 3, 224, 224)
    img[..., 96:128] = 1.0
    col = lfgm_from_pixels(img)[0].mean(0)
    assert set(col.topk(4).indices.tolist()) <= {5, 6, 7, 8}
    assert max(col[:3].max(), col[11:].max()) < 0.25 * col[5:9].max()


def _rocket():
    from skimage import data, transform

    img = transform.resize(data.rocket(), (224, 224), anti_aliasing=True).astype(np.float32)
    return img, torch.from_numpy(img).permute(2, 0, 1)[None]


def _edge_patches(img: np.ndarray, k: int = 15) -> np.ndarray:
    from skimage import color, filters

    strength = filters.sobel(color.rgb2gray(img)).reshape(14, 16, 14, 16).mean((1, 3))
    return np.argsort(strength.ravel())[-k:]


def test_real_photo_sky_low_edges_high():
    """scikit-image's rocket photo: the clear sky (rows 1-8 of the 14x14 grid) vs. the strongest edges."""
    img, tensor = _rocket()
    phi = lfgm_from_pixels(tensor)[0].numpy()
    sky = phi[1:9]
    edges = phi.ravel()[_edge_patches(img)]
    assert sky.mean() < 0.05 and sky.max() < 0.2
    assert edges.mean() > 0.15
    assert edges.mean() > 8 * sky.mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_real_photo_through_vit_patch_embedding(seed):
    """The same property on a (randomly initialised) ViT-S patch embedding, as the model sees the image."""
    import timm

    img, tensor = _rocket()
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad():
        tokens = model.patch_embed((tensor - 0.5) / 0.5)
    phi = lfgm_scores(tokens, (14, 14)).reshape(14, 14).numpy()
    assert phi[1:9].mean() < 0.06
    assert phi.ravel()[_edge_patches(img)].mean() > 3 * phi[1:9].mean()


def test_bad_inputs():
    with pytest.raises(ValueError, match="tokens must be"):
        lfgm_scores(torch.randn(1, 195, 4), (14, 14))
    with pytest.raises(ValueError, match="radius"):
        LFGM(radius=-1)
    with pytest.raises(ValueError, match="grid"):
        lfgm_from_pixels(torch.randn(1, 3, 100, 90))


# ------------------------------------------------------------------------------------ border-safe option
def numpy_reflect_reference(mean_map: np.ndarray, radius: float) -> np.ndarray:
    """Mirror-pad with numpy's 'symmetric' mode to 2H x 2W, full complex FFT, disc in original-grid units, crop."""
    b, h, w = mean_map.shape
    ext = np.pad(mean_map, ((0, 0), (0, h), (0, w)), mode="symmetric")
    spec = np.fft.fft2(ext, norm="ortho")
    ky = np.fft.fftfreq(2 * h) * h  # cycles per h patches
    kx = np.fft.fftfreq(2 * w) * w
    spec = spec * ((ky[:, None] ** 2 + kx[None, :] ** 2) > radius**2)
    hp = np.fft.ifft2(spec, norm="ortho").real[:, :h, :w]
    e = (hp**2).reshape(b, -1)
    lo, hi = e.min(1, keepdims=True), e.max(1, keepdims=True)
    return (e - lo) / (hi - lo + 1e-6)


def test_reflect_matches_independent_reference():
    x = torch.randn(2, 14 * 12, generator=torch.Generator().manual_seed(3))
    phi = lfgm_from_channel_mean(x, (14, 12), 2, border="reflect")
    np.testing.assert_allclose(phi.numpy(), numpy_reflect_reference(x.reshape(2, 14, 12).numpy(), 2), atol=1e-5)


def test_reflect_ignores_a_ramp_that_wrap_calls_an_edge():
    """A smooth left-to-right ramp has no edge; the periodic FFT sees a jump between the first and last column."""
    ramp = torch.linspace(0, 1, 14).repeat(14, 1).reshape(1, -1)
    wrap = lfgm_from_channel_mean(ramp, (14, 14), 2, border="wrap").reshape(14, 14)
    assert wrap[:, [0, 13]].mean() > 0.5  # border columns light up
    # Reflect: the mirrored ramp is a triangle wave, nearly all below the cut-off; what is left is tiny everywhere
    # (min-max would stretch it to [0, 1]), so compare the raw high-pass energy before normalisation.
    h, w = 14, 14
    f = ramp.reshape(1, h, w)
    ext = torch.cat([f, f.flip(-2)], -2)
    ext = torch.cat([ext, ext.flip(-1)], -1)
    spec = torch.fft.rfft2(ext, norm="ortho") * highpass_mask(2 * h, 2 * w, 2, scale=2)
    reflect_energy = torch.fft.irfft2(spec, s=(2 * h, 2 * w), norm="ortho")[:, :h, :w].square()
    spec_w = torch.fft.rfft2(f, norm="ortho") * highpass_mask(h, w, 2)
    wrap_energy = torch.fft.irfft2(spec_w, s=(h, w), norm="ortho").square()
    assert reflect_energy.max() < 0.05 * wrap_energy.max()


def test_bad_border():
    with pytest.raises(ValueError, match="border must be one of"):
        lfgm_scores(torch.randn(1, 196, 4), (14, 14), border="zero")


PHOTOS = ("astronaut", "chelsea", "coffee")


def _photo_and_sobel(name: str):
    from skimage import color, data, filters, transform

    img = transform.resize(getattr(data, name)(), (224, 224), anti_aliasing=True).astype(np.float32)
    sobel = filters.sobel(color.rgb2gray(img)).reshape(14, 16, 14, 16).mean((1, 3))  # edge strength per patch
    return torch.from_numpy(img).permute(2, 0, 1)[None], sobel


def _smooth_edge_means(name: str, border: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Mean LFGM over the smoothest and the edgiest quarter of patches (ranked by Sobel, independent of LFGM)."""
    tensor, sobel = _photo_and_sobel(name)
    phi = lfgm_from_pixels(tensor, border=border)[0].numpy()
    lo, hi = np.quantile(sobel, [0.25, 0.75])
    return float(phi[sobel <= lo].mean()), float(phi[sobel >= hi].mean()), phi, sobel <= lo


@pytest.mark.parametrize("name", PHOTOS)
def test_reflect_scores_smooth_below_edges_on_real_photos(name):
    smooth, edge, _, _ = _smooth_edge_means(name, "reflect")
    assert smooth < edge, (name, smooth, edge)


def test_wrap_border_artefact_on_real_photos_and_reflect_removes_it():
    """The guide's periodic FFT: smooth patches on the image border score far above smooth interior ones."""
    ring = np.zeros((14, 14), bool)
    ring[0] = ring[-1] = ring[:, 0] = ring[:, -1] = True
    inverted = 0
    for name in PHOTOS:
        s_wrap, e_wrap, phi_wrap, smooth = _smooth_edge_means(name, "wrap")
        _, _, phi_reflect, _ = _smooth_edge_means(name, "reflect")
        inverted += s_wrap >= e_wrap
        border_smooth = smooth & ring
        assert border_smooth.any()
        assert phi_wrap[border_smooth].mean() > 1.5 * phi_wrap[smooth & ~ring].mean()
        assert phi_reflect[border_smooth].mean() < 0.75 * phi_wrap[border_smooth].mean()
    assert inverted >= 1  # with wrap, at least one photo ranks its smooth quarter above its edges
