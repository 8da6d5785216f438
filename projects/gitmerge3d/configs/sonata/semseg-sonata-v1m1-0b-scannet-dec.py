# Sonata 0b: decoder probing on ScanNet (encoder frozen, decoder + head train).
_base_ = ["semseg-sonata-v1m1-0c-scannet-ft.py"]
model = dict(backbone=dict(freeze_encoder=True))
