"""Interpolated Kneser-Ney n-gram language model, fitted by counting (Chen & Goodman 1998, eq. 17).

An n-gram is a context h of n-1 tokens followed by a token w; N is the order, V the vocabulary.

    P_n(w|h) = max(v_n(hw) - D_n, 0) / S(h)  +  D_n T(h) / S(h) * P_{n-1}(w|h')      S(h) > 0
    P_n(w|h) = P_{n-1}(w|h')                                                          S(h) = 0
    P_0(w)   = 1 / V

h' is h without its first token; S(h) = sum_w v_n(hw); T(h) = #{w : v_n(hw) > 0}. At the highest
order v_N is the raw count c(hw); below it is the continuation count N1+(.hw), the number of
distinct tokens seen before hw (so an n-gram seen only at the very start of the training text has
none). Since v >= 1 wherever v > 0 and D <= 1, each P_n(.|h) sums to 1 over the vocabulary, and
the uniform P_0 gives every token non-zero probability after any context, seen or not.
D_n is n1 / (n1 + 2 n2) from the order's count-of-counts (n1: values equal to 1, n2: to 2), 0.5
when n1 = 0, unless a fixed discount is given.

Tables (numpy, built with np.unique/np.bincount over all positions at once):
  k-gram index   rank of key_k = first token * U_{k-1} + index of its last k-1 tokens (U_0 = 1, the
                 empty gram has index 0): sorted keys_k, k = 1..N-1, look contexts up suffix-first.
  order n rows   rowkey_n = index(h) * V + w, sorted, with value_n = v_n(hw) > 0: the row of a
                 context is a contiguous run, found with searchsorted.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from hpclm.errors import HpclmError


def _kgram_tables(tokens: np.ndarray, order: int) -> list[dict]:
    """Per k = 1..order: sorted unique keys, each one's first position and count, and the index of the
    (k-1)-gram starting at each k-gram's position (its context)."""
    n_tok = len(tokens)
    prev_index = np.zeros(n_tok + 1, dtype=np.int64)  # the empty gram, at every position
    prev_unique = 1
    tables = []
    for k in range(1, order + 1):
        m = max(n_tok - k + 1, 0)  # positions where a k-gram starts
        key = tokens[:m] * prev_unique + prev_index[1:m + 1]  # first token, index of the suffix (k-1)-gram
        keys, first, index, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        tables.append({"keys": keys, "first": first, "counts": counts, "prefix_index": prev_index[:m]})
        prev_index, prev_unique = index.reshape(-1), len(keys)
    return tables


class NgramLM(nn.Module):
    """Interpolated Kneser-Ney over a fixed vocabulary; fit(tokens) counts, forward() scores and predicts.

    The tables are numpy arrays outside torch's parameter/buffer machinery (their sizes depend on
    the data); state_dict()/load_state_dict() carry them as tensors through the checkpoint.
    """

    def __init__(self, vocab_size: int, order: int = 5, block_size: int = 64, discount: float = 0.0):
        super().__init__()
        if order < 1:
            raise HpclmError(f"model.order must be >= 1, got {order}")
        if not 0.0 <= discount <= 1.0:
            raise HpclmError(f"model.discount must be in [0, 1] (0: estimated per order), got {discount}")
        self.vocab_size, self.order, self.block_size, self.fixed_discount = vocab_size, order, block_size, discount
        self.tables: dict[str, np.ndarray] | None = None

    # --- fitting -------------------------------------------------------------------------------

    def fit(self, tokens: np.ndarray) -> "NgramLM":
        """Count every n-gram of `tokens` (a 1-d array of ids < vocab_size), orders 1..N, in one pass each."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise HpclmError(f"token ids must be in 0..{self.vocab_size - 1} to fit an n-gram model")
        N, V = self.order, self.vocab_size
        grams = _kgram_tables(tokens, N)
        tables = {f"keys.{k}": grams[k - 1]["keys"] for k in range(1, N)}
        discounts = np.zeros(N)
        for n in range(1, N + 1):
            g = grams[n - 1]
            if n == N:
                value = g["counts"]
            else:  # N1+(. g): distinct (n+1)-grams whose suffix is g
                value = np.bincount(grams[n]["keys"] % len(g["keys"]), minlength=len(g["keys"])) if len(g["keys"]) \
                    else np.zeros(0, dtype=np.int64)
            context = g["prefix_index"][g["first"]]
            word = tokens[g["first"] + n - 1]
            rowkey = context * V + word
            keep = value > 0
            order_ = np.argsort(rowkey[keep], kind="stable")
            tables[f"rowkey.{n}"] = rowkey[keep][order_]
            tables[f"value.{n}"] = value[keep][order_].astype(np.int64)
            discounts[n - 1] = self.fixed_discount or self.estimate_discount(tables[f"value.{n}"])
        tables["discount"] = discounts
        self._set_tables(tables)
        return self

    @staticmethod
    def estimate_discount(values: np.ndarray) -> float:
        """n1 / (n1 + 2 n2) over one order's counts; 0.5 when no count is 1 (then nothing was seen once)."""
        n1, n2 = int(np.count_nonzero(values == 1)), int(np.count_nonzero(values == 2))
        return n1 / (n1 + 2 * n2) if n1 else 0.5

    def _set_tables(self, tables: dict[str, np.ndarray]) -> None:
        """Install the tables and derive per-context S(h), T(h) for every order."""
        V = self.vocab_size
        self.tables = tables
        self._keys = [None] + [tables[f"keys.{k}"] for k in range(1, self.order)]
        self._rowkey, self._value, self._S, self._T = [None], [None], [None], [None]
        for n in range(1, self.order + 1):
            rowkey, value = tables[f"rowkey.{n}"], tables[f"value.{n}"]
            n_contexts = 1 if n == 1 else len(self._keys[n - 1])
            context = rowkey // V
            self._rowkey.append(rowkey)
            self._value.append(value.astype(np.float64))
            self._S.append(np.bincount(context, weights=value, minlength=n_contexts))
            self._T.append(np.bincount(context, minlength=n_contexts).astype(np.float64))
        self.discounts = tables["discount"]

    # --- checkpoint ----------------------------------------------------------------------------

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        self._check_fitted()
        state = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in self.tables.items()}
        state["vocab_size"] = torch.tensor(self.vocab_size)
        return state

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        want = {f"keys.{k}" for k in range(1, self.order)} | {f"{t}.{n}" for t in ("rowkey", "value")
                                                             for n in range(1, self.order + 1)} | {"discount", "vocab_size"}
        if set(state) != want or int(state["vocab_size"]) != self.vocab_size:
            raise HpclmError(f"this checkpoint does not hold an order-{self.order} n-gram model over "
                             f"{self.vocab_size} tokens (its tables: {', '.join(sorted(state))})")
        self._set_tables({k: v.cpu().numpy() for k, v in state.items() if k != "vocab_size"})

    def _check_fitted(self) -> None:
        if self.tables is None:
            raise HpclmError("the n-gram model has no counts yet: fit it (hpclm train) or load a checkpoint")

    # --- probabilities -------------------------------------------------------------------------

    def context_indices(self, history: np.ndarray) -> np.ndarray:
        """history [P, N-1] (oldest first, -1 where absent) -> [N, P]: the row of each order, -1 if unseen."""
        P, N = history.shape[0], self.order
        ctx = np.full((N, P), -1, dtype=np.int64)
        ctx[0] = 0
        current = np.zeros(P, dtype=np.int64)  # index of the context of length k-1
        for k in range(1, N):
            keys = self._keys[k]
            below = 1 if k == 1 else len(self._keys[k - 1])
            token = history[:, -k]
            key = token * below + current
            if not len(keys):
                break
            pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
            current = np.where((current >= 0) & (token >= 0) & (keys[pos] == key), pos, -1)
            ctx[k] = current
        return ctx

    def _seen_contexts(self, contexts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose order-n context occurred in training (known, nonzero count), and those contexts."""
        rows = np.flatnonzero(contexts >= 0)
        rows = rows[self._S[n][contexts[rows]] > 0]
        return rows, contexts[rows]

    def target_probs(self, history: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """P(target | history) for each row: [P] float64, from the targets' entries alone."""
        self._check_fitted()
        V = self.vocab_size
        ctx = self.context_indices(history)
        p = np.full(len(targets), 1.0 / V)
        for n in range(1, self.order + 1):
            rows, c = self._seen_contexts(ctx[n - 1], n)
            if not len(rows):
                continue
            rowkey, value = self._rowkey[n], self._value[n]
            key = c * V + targets[rows]
            pos = np.minimum(np.searchsorted(rowkey, key), len(rowkey) - 1)
            v = np.where(rowkey[pos] == key, value[pos], 0.0)
            D = self.discounts[n - 1]
            p[rows] = (np.maximum(v - D, 0.0) + D * self._T[n][c] * p[rows]) / self._S[n][c]
        return p

    def distributions(self, history: np.ndarray) -> np.ndarray:
        """P(. | history) over the whole vocabulary for each row: [P, V] float64, rows sum to 1."""
        self._check_fitted()
        V = self.vocab_size
        ctx = self.context_indices(history)
        probs = np.full((len(history), V), 1.0 / V)
        for n in range(1, self.order + 1):
            rows, c = self._seen_contexts(ctx[n - 1], n)
            if not len(rows):
                continue
            rowkey, value = self._rowkey[n], self._value[n]
            start, end = np.searchsorted(rowkey, c * V), np.searchsorted(rowkey, (c + 1) * V)
            length = end - start
            entry = np.arange(length.sum()) + np.repeat(start - np.cumsum(length) + length, length)
            counts = np.zeros((len(rows), V))
            counts[np.repeat(np.arange(len(rows)), length), rowkey[entry] % V] = value[entry]
            D = self.discounts[n - 1]
            probs[rows] = (np.maximum(counts - D, 0.0) + (D * self._T[n][c])[:, None] * probs[rows]) \
                / self._S[n][c][:, None]
        return probs

    def histories(self, idx: np.ndarray) -> np.ndarray:
        """idx [B, T] -> [B*T, N-1]: the last N-1 tokens up to and including each position, -1-padded."""
        B, T = idx.shape
        width = self.order - 1
        if width == 0:
            return np.zeros((B * T, 0), dtype=np.int64)
        padded = np.concatenate([np.full((B, width), -1, dtype=np.int64), idx.astype(np.int64)], axis=1)
        # window j + 1 of the padded rows ends at position j
        return np.lib.stride_tricks.sliding_window_view(padded, width, axis=1)[:, 1:].reshape(B * T, width)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits, loss) like the neural models, each position seeing only the window before it.

        With targets: (None, mean -log P(target)), computed from the targets' probabilities alone
        (no [B, T, V] tensor). Without: (log P(. | window) of the last position [B, 1, V], None).
        """
        x = idx.detach().cpu().numpy()
        if targets is None:
            x = x[:, -self.order:]
            last = self.histories(x)[x.shape[1] - 1::x.shape[1]]
            logp = np.log(self.distributions(last))
            return torch.from_numpy(logp).to(idx.device)[:, None, :], None
        y = targets.detach().cpu().numpy().reshape(-1).astype(np.int64)
        nll = -np.log(self.target_probs(self.histories(x), y))
        return None, torch.tensor(nll.mean(), device=idx.device)

    def extra_repr(self) -> str:
        sizes = "" if self.tables is None else ", n-grams " + "/".join(
            str(len(self.tables[f"rowkey.{n}"])) for n in range(1, self.order + 1))
        return f"vocab_size={self.vocab_size}, order={self.order}{sizes}"
