r"""Main job: the paper's CNN (four conv-BN-ReLU-pool blocks, dense head) on Medical MNIST, 4 epochs.

Run (from the repo root):
  python -m medjax.main --config=configs/base.py --workdir=workdirs/base \
    --config.data.manual_dir=../shared/data
  python -m medjax.evaluate --workdir=workdirs/base --split=test

Expected: ~99.98% test accuracy (99.976% ± 0.011% over 3 seeds), ~2 min on a 2-core CPU.
"""

import ml_collections
from ml_collections import config_dict


def paper_cnn_model() -> ml_collections.ConfigDict:
    """`config.model` of the paper CNN: its name and the fields of medjax.models.PaperCNN."""
    model = ml_collections.ConfigDict()
    model.name = "paper_cnn"
    model.features = (16, 32, 64, 128)  # Channels of each conv-BN-ReLU-pool block.
    model.dense_features = 128
    model.dropout_rate = 0.3
    model.bn_momentum = 0.9
    model.bn_epsilon = 1e-5
    model.dtype = "float32"  # Compute dtype; 'bfloat16' for mixed precision on GPU/TPU.
    return model


def get_config() -> ml_collections.ConfigDict:
    """Returns the main-job configuration."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.ops = "auto"  # Layers: 'flax', 'cpu' (medjax.cpu's XLA:CPU drop-ins) or 'auto' (cpu on CPU).
    # medjax.cpu's pieces, used when ops resolves to 'cpu'; each is described in docs/performance.md.
    config.cpu = ml_collections.ConfigDict()
    config.cpu.compiler_options = True  # Per-model XLA:CPU compile options.
    config.cpu.malloc = True  # glibc keeps freed memory for the next step.
    config.cpu.huge_pages = True  # With malloc: that memory in transparent huge pages.
    config.cpu.small_patches = True  # Patch matmuls where the input or output is smaller than the kernel.
    config.cpu.max_pool = True  # Max pool with a fused gradient (ResNet's stem).
    config.cpu.pool_first = True  # Paper CNN blocks pool before normalising.
    config.cpu.fused_block = True  # Paper CNN's first block in one C++ pass.

    config.data = ml_collections.ConfigDict()
    config.data.name = "medical_mnist"
    # Folder holding `medical_mnist/` (class folders or MedNIST.tar.gz). Unset: $MEDJAX_MANUAL_DIR, else download.
    config.data.manual_dir = config_dict.placeholder(str)
    # Where prepared TFDS data lives. Unset: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    config.data.tfds_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.test_split = "test"
    # Use only the first N training examples of a seeded permutation (-1: all of them).
    config.data.num_train_examples = -1
    # Pixel normalisation applied inside the jitted step: (x / 255 - mean) / std.
    config.data.mean = 0.5
    config.data.std = 0.25
    # Inside the step, before normalising: resize to image_size x image_size (bilinear; 0: as stored) and
    # convert to `channels` channels (gray -> RGB repeats, RGB -> gray averages; 0: as stored).
    config.data.image_size = 0
    config.data.channels = 0

    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True
    config.augment.rotation_degrees = 10.0
    config.augment.scale_range = (0.9, 1.1)
    config.augment.translate_fraction = 0.08
    config.augment.horizontal_flip = False
    config.augment.brightness = 0.1  # Fraction of the 0..255 range.
    config.augment.contrast = 0.1  # Contrast factor drawn from [1 - c, 1 + c].
    config.augment.fill_mode = "nearest"

    config.model = paper_cnn_model()

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # Global, across all devices and processes.
    config.train.num_epochs = 4.0
    config.train.optimizer = "adamw"
    config.train.learning_rate = 3e-3
    config.train.weight_decay = 1e-4
    config.train.schedule = "cosine"  # 'cosine' or 'constant', both after a linear warmup.
    config.train.warmup_steps = 100
    config.train.label_smoothing = 0.0
    config.train.log_every_steps = 50
    config.train.eval_every_steps = 0  # 0: once an epoch.
    # Stop after the first evaluation whose accuracy reaches this (unset: train all epochs).
    config.train.stop_at_eval_accuracy = config_dict.placeholder(float)
    config.train.checkpoint_every_steps = 500
    # Re-estimate batch-norm statistics on this many clean (unaugmented) training batches before each
    # evaluation and the final checkpoint; 0 keeps the running averages gathered on augmented batches.
    config.train.bn_calibration_batches = 50
    config.train.max_checkpoints_to_keep = 3

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500

    # Transfer learning (medjax/transfer.py): a medjax workdir (its latest checkpoint) or a directory
    # written by `python -m medjax.convert` (e.g. ImageNet weights) to initialise the backbone from; the
    # head is re-initialised for this dataset's classes. Unset: train from scratch. Ignored when the
    # workdir already has a checkpoint (the run resumes from it).
    config.init_from = config_dict.placeholder(str)
    config.transfer = ml_collections.ConfigDict()
    config.transfer.init_step = config_dict.placeholder(int)  # Unset: the source's latest step.
    # 'full', 'linear_probe' (head only), 'frozen_stages' (stem + first `frozen_stages` stages frozen) or
    # 'per_group_lr' (backbone at backbone_lr_multiplier x the learning rate).
    config.transfer.mode = "full"
    config.transfer.frozen_stages = 0
    # Learning-rate factor of the trainable backbone in 'per_group_lr' and 'frozen_stages' modes.
    config.transfer.backbone_lr_multiplier = 0.1
    # When the source saw other input channels: 'sum' adapts the first conv kernel, 'repeat' converts the
    # images to the source's channels inside the step.
    config.transfer.input_adapter = "sum"
    # Require config.data.mean/std to equal the source's normalisation.
    config.transfer.check_preprocessing = True

    return config
