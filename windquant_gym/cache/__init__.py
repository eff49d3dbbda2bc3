"""The on-disk caches: :mod:`.storage` writes and reads entries safely under crashes and
concurrency (every cached thing goes through it); :mod:`.listing` lists and clears them. This
package exports the storage only: the listing imports the modules whose entries it describes,
and those import the storage."""

from .storage import CACHE_KINDS, atomic_path, build_lock, load_entry, load_or_build, source_version, staging_prefix

__all__ = ["CACHE_KINDS", "atomic_path", "build_lock", "load_entry", "load_or_build", "source_version", "staging_prefix"]
