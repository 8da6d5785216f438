_base_ = ["semseg-sonata-v1m1-3a-s3dis-lin.py"]
model = dict(backbone=dict(enable_flash=False, additional_info=dict(tome="patch", r=0.8, stride=5, no_rand=True)))
