_base_ = ["semseg-sonata-v1m1-0c-scannet-ft.py"]
model = dict(backbone=dict(enable_flash=False, additional_info=dict(tome="patch", r=0.9, stride=10, no_rand=True)))
