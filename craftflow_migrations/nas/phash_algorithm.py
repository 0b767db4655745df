"""The name stored with every pHash, without importing imagehash (and numpy behind it).

A re-run of an unchanged NAS reads the store and hashes nothing: importing ``hashing`` for
this one string cost it 56 ms of its 0.9 s. The installed distribution's version is the
module's own ``__version__`` (a test holds them equal). ``hashing.phash_hex`` computes the same
bits faster; tests compare it with the installed imagehash on photographs, noise and every
degenerate design, so an imagehash whose pHash changed fails them instead of being misnamed.
"""

from importlib.metadata import version

HASH_SIZE = 16
PHASH_ALGORITHM = f"imagehash-{version('ImageHash')}:phash:hash_size={HASH_SIZE}"
