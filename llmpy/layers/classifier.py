"""Softmax + cross-entropy, fused: the probabilities are formed in the logits buffer and turned into dlogits in
place, so no separate (N, V) probability tensor is ever kept. Only the V real vocabulary columns are passed in:
padded rows of the embedding never receive probability. Rows are independent, so a caller may run this on any
block of rows (the CPU backend does, so that each block's passes stay in cache)."""
import numpy as np

from ._scratch import buf


def fused_classifier(losses, logits, targets, dloss=None, scratch=None):
    # losses (N,) = -log softmax(logits)[target]; logits (N, V) CLOBBERED: with dloss (the gradient of the
    # mean loss w.r.t. each row's loss, e.g. 1/N) it becomes dlogits = dloss * (softmax - onehot(target)).
    # targets (N,) int. scratch: 2*N elements
    N = logits.shape[0]
    s = buf(scratch, (2, N), logits.dtype)
    mx, z = s[0], s[1]
    rows, t, loss = np.arange(N), targets.reshape(N), losses.reshape(N)
    np.max(logits, axis=-1, out=mx)
    np.subtract(mx, logits[rows, t], out=loss)     # loss = log(z) + max - logit[target], z = sum exp(l - max)
    logits -= mx[:, None]
    np.exp(logits, out=logits)                     # unnormalised probabilities
    np.einsum("nv->n", logits, out=z)              # row sums (einsum: 3x np.sum's pairwise summation here)
    if dloss is not None:
        np.divide(dloss, z, out=mx)
        logits *= mx[:, None]                      # dloss * softmax
        logits[rows, t] -= dloss
    np.log(z, out=z)
    loss += z


def crossentropy_forward(losses, logits, targets):
    """Loss only, logits left intact (eval and tests). losses (N,), logits (N, V), targets (N,)."""
    work = np.array(logits, copy=True)
    fused_classifier(losses, work, targets)
