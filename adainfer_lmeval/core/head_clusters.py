"""Clusters of the LM head's rows: a cheap picker of an exit check's candidate tokens.

With ``check_vocab=K`` a row's *first* exit check needs K candidate tokens. Taking them from
the full head means a matrix-vector product over the whole vocabulary, which at one position
is memory-bound and costs about as much as a whole 128-token decoder layer on a CPU
(reports/benchmark/). ``check_clusters=C`` instead groups the head's V rows once into C
clusters by direction (spherical k-means on the unit rows), scores the normalised hidden
state h against each cluster as (h · direction) × (the largest row norm in the cluster), and
computes the exact logits of the members of the ``probes`` best clusters only (an inverted
file for maximum-inner-product search, as in approximate-nearest-neighbour libraries). The K
best of those are the candidates. A pick multiplies C + (members probed) head rows instead of
V, and reports that count so the FLOPs accounting charges what ran.

It is approximate: the true top token may sit in a cluster that was not probed. How often
that happens at the layers where policies decide, and what a pick costs on those states, is
measured by ``python -m adainfer_lmeval.experiments.benchmark`` and reported in reports/benchmark/.
Why this score: plain k-means scored by each cluster's mean row misses winners on Qwen's
untied head, whose winning rows are large and outlying, and clusters forced to equal sizes
miss them more (a capacity limit evicts exactly those rows). Both were tried in exploratory
scripts that are not kept, so no figures are quoted for them; the chosen score's recall is
what the benchmark measures.

The partition depends only on the head's weights; it is built deterministically (seeded) and
cached as safetensors under the cache root, keyed by the head's sha256. Nothing is pickled.
Knows nothing of lm-eval or of policies.
"""

from __future__ import annotations

import hashlib
import torch

from adainfer_lmeval.cache import cache_path
from adainfer_lmeval.errors import AdaInferError

DEFAULT_PROBE_FRACTION = 1 / 32  # share of clusters probed per pick (reports/benchmark/: ~2-3% of the head)


class HeadClusters:
    def __init__(self, directions: torch.Tensor, scale: torch.Tensor, assign: torch.Tensor, probes: int | None = None):
        self.directions = directions  # [C, d]: each cluster's unit mean direction
        self.scale = scale  # [C]: the largest row norm in each cluster
        self.assign = assign  # [V]: each token's cluster
        self.sizes = torch.bincount(assign, minlength=len(directions))
        # the tokens sorted by cluster: cluster c's members are members[starts[c]:starts[c + 1]]
        self.members = torch.argsort(assign, stable=True)
        self._sizes = self.sizes.tolist()
        self._starts = [0] + torch.cumsum(self.sizes, 0).tolist()
        clusters = len(directions)
        self.probes = int(probes) if probes else max(1, round(clusters * DEFAULT_PROBE_FRACTION))
        if not 1 <= self.probes <= clusters:
            raise AdaInferError(f"check_probes={probes} must be between 1 and check_clusters={clusters}")

    @property
    def clusters(self) -> int:
        return len(self.directions)

    def with_probes(self, probes: int) -> "HeadClusters":
        return HeadClusters(self.directions, self.scale, self.assign, probes)

    def to(self, device) -> "HeadClusters":
        return HeadClusters(self.directions.to(device), self.scale.to(device), self.assign.to(device), self.probes)

    # ---- picking ------------------------------------------------------------------------------

    def pick(self, stack, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``hidden`` [rows, d]: K candidate token ids [rows, k], their exit logits [rows, k],
        and the head rows each pick multiplied [rows] (centroids included).

        A row probes its ``probes`` best clusters, and more in score order if those hold fewer
        than K tokens.
        """
        normed = stack.final_norm(hidden)
        scores = (normed.to(self.directions.dtype) @ self.directions.T) * self.scale  # [rows, C]
        best_clusters = scores.topk(self.probes, dim=-1).indices.tolist()
        ids_out, logits_out, rows_out = [], [], []
        for row, clusters in enumerate(best_clusters):  # rows probe different numbers of tokens
            if sum(self._sizes[c] for c in clusters) < k:  # rare: tiny clusters; take more in score order
                clusters = self._enough_clusters(scores[row], k)
            ids = torch.cat([self.members[self._starts[c] : self._starts[c + 1]] for c in clusters])
            logits = stack.head_logits_over(normed[row : row + 1], ids.unsqueeze(0))[0]
            best = logits.topk(k)
            ids_out.append(ids[best.indices])
            logits_out.append(best.values)
            rows_out.append(self.clusters + len(ids))
        return torch.stack(ids_out), torch.stack(logits_out), torch.tensor(rows_out, device=hidden.device)

    def _enough_clusters(self, scores: torch.Tensor, k: int) -> list[int]:
        order = scores.argsort(descending=True).tolist()
        taken, held = [], 0
        for c in order:
            taken.append(c)
            held += self._sizes[c]
            if len(taken) >= self.probes and held >= k:
                break
        return taken

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def for_head(cls, weight: torch.Tensor, clusters: int, probes: int | None = None, cache: bool = True) -> "HeadClusters":
        """The clustering of ``weight`` [V, d] into ``clusters`` clusters, from the cache or built now.

        The cache keeps the clustering (directions, assignment); the row norms come from
        ``weight`` each time.
        """
        vocab = weight.shape[0]
        if not 2 <= clusters <= vocab // 2:
            raise AdaInferError(f"check_clusters={clusters} must be between 2 and {vocab // 2} (half the vocabulary)")
        if probes is not None and not (isinstance(probes, int) and 1 <= probes <= clusters):
            # before the cache is read: a bad count is the user's, not a torn cache file
            raise AdaInferError(f"check_probes={probes!r} must be an integer between 1 and check_clusters={clusters}")
        host = weight.detach().float().cpu().contiguous()
        norms = host.norm(dim=1)
        path = None
        if cache:
            digest = hashlib.sha256(host.numpy().tobytes()).hexdigest()[:20]
            path = cache_path("head_clusters", f"{digest}-{clusters}.safetensors")
        if path is not None and path.exists():
            from safetensors.torch import load_file

            saved = None
            try:
                saved = load_file(str(path))
                directions, assign = saved["directions"], saved["assign"].long()
            except Exception as error:  # a torn or foreign file: rebuild rather than fail
                saved = None
                print(f"[adainfer] head clusters cache {path} unreadable ({error}); rebuilding", flush=True)
            if saved is not None and directions.shape == (clusters, host.shape[1]) and assign.shape == (vocab,) \
                    and bool(((assign >= 0) & (assign < clusters)).all()):
                return cls(directions, _max_per_cluster(norms, assign, clusters), assign, probes).to(weight.device)
        means, assign = kmeans(host / norms.clamp_min(1e-12)[:, None], clusters)
        directions = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"directions": directions, "assign": assign.int()}, str(tmp))
            tmp.replace(path)
        return cls(directions, _max_per_cluster(norms, assign, clusters), assign, probes).to(weight.device)


def _max_per_cluster(values: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    return torch.zeros(clusters, dtype=values.dtype).scatter_reduce(0, assign, values, reduce="amax", include_self=False)


def kmeans(points: torch.Tensor, clusters: int, iters: int = 8, seed: int = 0, chunk: int = 16384):
    """(centroids [C, d], assignment [V]): Lloyd's k-means, seeded, deterministic on a CPU.

    Empty clusters keep their previous centroid. The returned centroids are the means of the
    final members, so that scoring a centroid estimates its members' mean logit.
    """
    vocab = points.shape[0]
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(vocab, generator=generator)[:clusters]].clone()
    norms = (points * points).sum(1)

    def nearest(cents: torch.Tensor) -> torch.Tensor:
        cent_norms = (cents * cents).sum(1)
        return torch.cat([
            (norms[s : s + chunk, None] - 2 * points[s : s + chunk] @ cents.T + cent_norms).argmin(1)
            for s in range(0, vocab, chunk)
        ])

    def means(assign: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros_like(previous).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=clusters)
        return torch.where((counts == 0)[:, None], previous, sums / counts.clamp_min(1)[:, None])

    for _ in range(iters):
        centroids = means(nearest(centroids), centroids)
    assign = nearest(centroids)
    return means(assign, centroids), assign
