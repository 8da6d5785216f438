# S3DIS, 13 classes (Pointcept folder format: data/s3dis/Area_{1..6}/<room>/*.npy; Area_5 is val/test).
_base_ = ["scannet.py"]
dataset_type = "S3DISDataset"
data_root = "data/s3dis"
_train_areas = ("Area_1", "Area_2", "Area_3", "Area_4", "Area_6")
data = dict(
    num_classes=13,
    names=[
        "ceiling",
        "floor",
        "wall",
        "beam",
        "column",
        "window",
        "door",
        "table",
        "chair",
        "sofa",
        "bookcase",
        "board",
        "clutter",
    ],
    train=dict(type=dataset_type, split=_train_areas, data_root=data_root),
    val=dict(type=dataset_type, split="Area_5", data_root=data_root),
    test=dict(type=dataset_type, split="Area_5", data_root=data_root),
)
