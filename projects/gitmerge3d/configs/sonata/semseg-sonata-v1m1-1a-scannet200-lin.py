# Sonata 1a: linear probing on ScanNet200.
_base_ = ["semseg-sonata-v1m1-0a-scannet-lin.py", "../_base_/datasets/scannet200.py"]
model = dict(num_classes=200)
