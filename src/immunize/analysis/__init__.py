"""Depth analyses: *where* in the network a defence acts and *why* an attack does or does not undo it.

- ``weight_distance``: per-layer L2 distance between two models' weights (the paper's "depth" figure);
- ``representation_pca``: harmful vs harmless answer activations in 2-D, on axes shared by all models;
- ``logit_lens``: per layer, the probability of the harmful answer read out through the final norm + head.

Layer indexing, everywhere: 0 is the embedding output and k (1..L) the output of decoder layer k-1,
i.e. the indices of Hugging Face's ``output_hidden_states`` tuple.
"""

from immunize.analysis.lens import logit_lens
from immunize.analysis.representations import representation_pca
from immunize.analysis.weights import weight_distance

__all__ = ["logit_lens", "representation_pca", "weight_distance"]
