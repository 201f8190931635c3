"""Where the bench scripts find the repository and the shared data (../shared beside the repository:
corpora, NLTK data, eval sets, the C/C++ peers' sources; ../shared/README.md). Imported first, it
also puts the repository's modules on the path."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
GUTENBERG = SHARED / "corpora" / "gutenberg"  # about 3M tokens, with MANIFEST.tsv
EVAL = SHARED / "eval"
NLTK_DATA = SHARED / "nltk_data"
PEERS = SHARED / "peers"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
