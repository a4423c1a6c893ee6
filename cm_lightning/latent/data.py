"""Any image data module of this project trained on as latents: the source's images are encoded once into
a cache (``latent/cache.py``) in ``prepare_data`` (one process per node), and training reads the cache
memory-mapped in the source's own (seed, epoch) order, each rank its disjoint rows."""

from pathlib import Path

from cm_lightning.data.base import ImageDataModule
from cm_lightning.errors import ConfigError
from cm_lightning.latent import cache


class LatentDataModule(ImageDataModule):
    """``source`` is any ``ImageDataModule`` (built at its pixel ``image_size``); ``channels`` and ``image_size``
    here are the latent grid's, which the network must take. ``hflip`` stores each image's mirror's latents
    too (DiT), drawn by the sampler as index i + n."""

    def __init__(
        self,
        source: ImageDataModule,
        autoencoder,
        cache_dir,
        image_size: int,
        channels: int,
        shard_size: int = 1024,
        **kwargs,
    ):
        if not hasattr(autoencoder, "encode"):
            raise ConfigError("data is latent but autoencoder is none; pick one, e.g. autoencoder=digits_vae")
        if source.channels != autoencoder.image_channels:
            raise ConfigError(
                f"data.source.channels={source.channels} but the VAE at {autoencoder.folder} takes "
                f"{autoencoder.image_channels}-channel images; set data.source.channels={autoencoder.image_channels}"
            )
        autoencoder.check_image_size(source.image_size)
        grid = source.image_size // autoencoder.factor
        expected = (("image_size", image_size, grid), ("channels", channels, autoencoder.latent_channels))
        for key, value, right in expected:
            if value != right:
                raise ConfigError(
                    f"data.{key}={value} but the VAE at {autoencoder.folder} makes latents of {key} {right} from "
                    f"{source.image_size}-pixel images; set data.{key}={right}"
                )
        self.supported_channels = (channels,)
        super().__init__(image_size=image_size, channels=channels, **kwargs)
        self.source, self.autoencoder, self.shard_size = source, autoencoder, shard_size
        self.cache_dir = Path(str(cache_dir)).expanduser()
        self.num_classes = source.num_classes

    def manifest(self) -> dict:
        return {
            "vae": str(self.autoencoder.folder),
            **self.autoencoder.describe(),
            "resolution": self.source.image_size,
            "source": type(self.source).__qualname__,
            "source_size": len(self.source.dataset),
            "flips": self.hflip,
            "shard_size": self.shard_size,
        }

    def prepare_data(self) -> int:
        self.source.setup()
        return cache.build(
            self.cache_dir,
            self.source.dataset,
            self.autoencoder,
            self.manifest(),
            self.hflip,
            self.shard_size,
            self.seed,
        )

    def build_dataset(self):
        return cache.LatentRows(self.cache_dir, self.autoencoder.scaling, self.seed)

    def mirrored(self, dataset):
        return dataset  # the cache holds the mirrors' own latents: flipping a latent is not flipping the image
