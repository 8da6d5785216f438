# 100-epoch merged fine-tune, -w: a baseline 0c model_best.pth (semseg-sonata-v1m1-0-base-0c-scannet-ft).
_base_ = ["gitmerge3d-patch-0c-scannet-ft.py"]
model = dict(backbone=dict(additional_info=dict(r=0.8, stride=5, no_rand=True)))
epoch = 100
optimizer = dict(type="AdamW", lr=0.0001, weight_decay=0.05)
scheduler = dict(max_lr=[0.0, 0.0001], div_factor=100.0, final_div_factor=100.0)
param_dicts = [dict(keyword="block", lr=0.0002)]
# only the attention projections train (Pointcept's filter_grads); everything else is frozen
finetuning_param_list = ["attn.qkv", "attn.proj", "attn.new_layers"]
