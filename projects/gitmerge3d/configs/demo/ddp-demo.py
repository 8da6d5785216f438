# Quick multi-process check (scripts/ddp_gpu_run.sh): the r=0.9 merged fine-tune recipe (merging, frozen
# non-attention parameters, Mix3D 0.8, AMP, CE + Lovasz) on a reduced-width PT-v3m2 and the tiny demo data
# (gitmerge3d.tools.demo_data); test time adds Pointcept's SphereCrop(mode="all") crop to the voting.
_base_ = ["../sonata/gitmerge3d-patch-0c-scannet-ft-finetune-100epochs-r0.9-s10.py"]
model = dict(
    backbone_out_channels=32,
    backbone=dict(
        enc_depths=(1, 1, 1, 1, 1),
        enc_channels=(32, 32, 64, 64, 64),
        enc_num_head=(2, 2, 4, 4, 4),
        enc_patch_size=(128,) * 5,
        dec_depths=(1, 1, 1, 1),
        dec_channels=(32, 32, 64, 64),
        dec_num_head=(2, 2, 4, 4),
        dec_patch_size=(128,) * 4,
        drop_path=0.0,
    ),
)
data_root = "data/demo"  # the script passes data.*.data_root
data = dict(
    train=dict(data_root=data_root),
    val=dict(data_root=data_root),
    test=dict(data_root=data_root, test_cfg=dict(crop=dict(type="SphereCrop", point_max=4096, mode="all"))),
)
batch_size = 4  # total: 2 per process on 2 GPUs, so Mix3D overlays pairs
num_worker = 2
epoch = 3
seed = 7
