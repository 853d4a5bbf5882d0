"""Past one machine: sharded datastores (manifest over shards), sharded search, distributed builds on Ray."""

from knnlm.scale.manifest import ShardedDatastore, open_datastore  # noqa: F401
from knnlm.scale.search import ShardedSearcher, open_searcher  # noqa: F401
