"""Text -> token files -> batches: `corpus` reads a source, `prepare` tokenizes it into a dataset
folder, `tokenizers` holds the char and BPE tokenizers, `batches` opens a dataset and draws batches."""
from hpclm.data.batches import Dataset, batch_rng, get_batch, get_samples, load_dataset, token_dtype
from hpclm.data.corpus import Corpus, read_corpus
from hpclm.data.prepare import prepare

__all__ = ["Corpus", "Dataset", "batch_rng", "get_batch", "get_samples", "load_dataset", "prepare", "read_corpus", "token_dtype"]
