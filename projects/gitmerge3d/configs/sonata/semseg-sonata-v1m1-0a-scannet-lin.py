# Sonata 0a: linear probing on ScanNet (encoder only, frozen; features up-cast to 1232 channels; head trains).
_base_ = ["semseg-sonata-v1m1-0c-scannet-ft.py"]
model = dict(
    backbone_out_channels=1232,
    backbone=dict(enc_mode=True),
    freeze_backbone=True,
)
