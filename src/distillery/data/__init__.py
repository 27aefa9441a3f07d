"""Datasets: offline raw sources, the image+caption artifact format."""

from distillery.data.dataset import ImageCaptionDataset, build_image_caption_dataset, load_image_caption_dataset

__all__ = ["ImageCaptionDataset", "build_image_caption_dataset", "load_image_caption_dataset"]
