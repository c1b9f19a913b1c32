r"""The paper CNN on your own folder of class subfolders (PNG, JPEG or DICOM, any size), stored at 64x64 gray.

Layout: FOLDER/<class>/<image>; the class names are the sorted subfolder names (see docs/data.md).
Run (from the repo root):
  python -m medjax.main --config=configs/image_folder.py --workdir=workdirs/my_folder \
    --config.data.folder=/path/to/FOLDER
  python -m medjax.evaluate --workdir=workdirs/my_folder --split=test

The first run prepares FOLDER once into config.data.tfds_dir (de-duplicated, split 80/10/10 by content
hash); a later run prepares again only if FOLDER's files or the stored size or channels change.
"""

import ml_collections
from ml_collections import config_dict

from configs import base


def get_config() -> ml_collections.ConfigDict:
    """Returns the image-folder configuration."""
    config = base.get_config()
    config.data.name = "image_folder"
    config.data.folder = config_dict.placeholder(str)  # Root holding one subfolder per class.
    # Prepared images: resized to stored_image_size x stored_image_size (PIL bilinear, aspect ratio not
    # kept) and converted to stored_channels (1: grayscale, 3: RGB).
    config.data.stored_image_size = 64
    config.data.stored_channels = 1
    config.train.batch_size = 32  # Small folders need at least one batch of training images.
    config.train.num_epochs = 20.0
    config.train.warmup_steps = 50
    config.train.log_every_steps = 20
    config.train.bn_calibration_batches = 20
    return config
