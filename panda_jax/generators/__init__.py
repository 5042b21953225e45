"""Pretrained generators with layer access: `latents -> split -> resume`.

    gen = generators.load("converted/ffhq256")
    lat = gen.latents(z, truncation_psi=0.7)
    x, carry = gen.split(lat, layer=5)     # x: [n, h, w, c]
    img = gen.resume(x + delta, carry, lat, layer=5)

Each architecture module registers its `Generator` subclass on import; the
list below imports them all (one line per architecture).
"""

from panda_jax.generators import base
from panda_jax.generators.base import Generator, load, register, save_converted

__all__ = ["base", "Generator", "load", "register", "save_converted"]

from panda_jax.generators import stylegan2  # noqa: F401  (registers "stylegan2")
from panda_jax.generators import biggan  # noqa: F401  (registers "biggan")
from panda_jax.generators import progan  # noqa: F401  (registers "pggan")
from panda_jax.generators import stylegan1  # noqa: F401  (registers "stylegan")
from panda_jax.generators import stylegan3  # noqa: F401  (registers "stylegan3")
from panda_jax.generators import dcgan  # noqa: F401  (registers "dcgan")
