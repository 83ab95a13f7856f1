"""Training data: image discovery and captions, bucket frames, per-sample plans, batching, pairs.

Pure Python with Pillow and numpy; nothing here imports torch. The latent and text caches
(``trainer.data.cache``) turn the plans into tensors.

Typical use::

    items = discover_images(folder, trigger_word="sks")
    specs = plan_samples(items, "768,512", 128, 256, 2.0, sub_image_num=3, mirroring=True)
    batcher = BucketBatcher(group_by_bucket(specs), batch_size=2, seed=1)
    pixels, mask = specs[next(batcher)[0]].load()
"""

from trainer.data.batching import BucketBatcher
from trainer.data.buckets import format_frames
from trainer.data.errors import DataError, DataWarning, ImageLoadError
from trainer.data.frames import (
    fit_to_bucket, make_buckets, nearest_bucket, nearest_sub_buckets, needs_upscale, parse_image_size,
)
from trainer.data.images import (
    IMAGE_EXTENSIONS, ImageInfo, ImageItem, discover_images, make_item, open_image, probe_image, tag_frequency,
)
from trainer.data.pairs import PairSampleSpec, PairScan, difference_mask, find_pairs, plan_pair_samples
from trainer.data.samples import Placement, SampleSpec, bucket_indices, group_by_bucket, iter_loaded, plan_samples

__all__ = [
    "BucketBatcher", "DataError", "DataWarning", "IMAGE_EXTENSIONS", "ImageInfo", "ImageItem", "ImageLoadError",
    "PairSampleSpec", "PairScan", "Placement", "SampleSpec", "bucket_indices",
    "difference_mask", "discover_images", "find_pairs", "fit_to_bucket", "format_frames", "group_by_bucket",
    "iter_loaded", "make_buckets", "make_item", "nearest_bucket", "nearest_sub_buckets", "needs_upscale",
    "open_image", "parse_image_size", "plan_pair_samples", "plan_samples", "probe_image", "tag_frequency",
]
