_base_ = ["semseg-sonata-v1m1-0b-scannet-dec.py"]
model = dict(backbone=dict(enable_flash=False, additional_info=dict(tome="patch", r=0.9, stride=10)))
# no_rand is omitted as in the official 0b config; ours defaults it to True (the official code crashes).
