# weighted_patch evaluation of weights trained with the matching gitmerge3d-patch-* config.
_base_ = ["gitmerge3d-patch-0c-scannet-ft-finetune-100epochs-r0.9-s10.py"]
model = dict(backbone=dict(additional_info=dict(tome="weighted_patch", no_rand=False, low_r=32, threshold=0.9)))
