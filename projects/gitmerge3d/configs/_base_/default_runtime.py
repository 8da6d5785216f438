# Run settings shared by every config (Pointcept's names). Overridable with --options key=value.
weight = None  # a checkpoint to start from (sonata.pth / Pointcept pretraining / an earlier fine-tune)
resume = False  # True: continue exp/<d>/<name>/model/model_last.pth
evaluate = True  # per-epoch validation (single pass) choosing model_best.pth by mIoU
seed = 38873367
num_worker = 8
batch_size_val = 1
enable_amp = True
amp_dtype = "float16"
clip_grad = 3.0
empty_cache = False
max_train_iters = None  # stop after this many iterations (quick runs and tests); None: all epochs
max_val_scenes = None
eval_epoch = None  # None: validate every epoch
find_unused_parameters = False  # DDP; frozen parameters need no flag (they have requires_grad=False)
