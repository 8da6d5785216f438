_base_ = ["semseg-sonata-v1m1-3a-s3dis-lin.py"]
model = dict(
    backbone=dict(
        enable_flash=False,
        additional_info=dict(tome="weighted_patch", r=0.7, stride=3, no_rand=False, low_r=32, threshold=0.9),
    )
)
