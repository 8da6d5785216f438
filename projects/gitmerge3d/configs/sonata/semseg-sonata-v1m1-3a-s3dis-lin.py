# Sonata 3a: linear probing on S3DIS (Area 5 held out).
_base_ = ["semseg-sonata-v1m1-0a-scannet-lin.py", "../_base_/datasets/s3dis.py"]
model = dict(num_classes=13)
batch_size = 8  # GitMerge3D's S3DIS linear configs
