"""Softmax + cross-entropy, fused: the probabilities are formed in the logits buffer and turned into dlogits in
place, so no separate (N, V) probability tensor is ever kept. Only the V real vocabulary columns are passed in:
padded rows of the embedding never receive probability."""
import numpy as np

from ._scratch import buf


def fused_classifier(losses, logits, targets, dloss=None, scratch=None):
    # losses (N,) = -log softmax(logits)[target]; logits (N, V) CLOBBERED: with dloss (the gradient of the
    # mean loss w.r.t. each row's loss, e.g. 1/N) it becomes dlogits = dloss * (softmax - onehot(target)).
    # targets (N,) int. scratch: 2*N elements
    N = logits.shape[0]
    s = buf(scratch, (2, N), logits.dtype)
    mx, tgt = s[0], s[1]
    rows = np.arange(N)
    t = targets.reshape(N)
    np.max(logits, axis=-1, out=mx)
    logits -= mx[:, None]
    tgt[...] = logits[rows, t]
    np.exp(logits, out=logits)
    np.sum(logits, axis=-1, out=mx)
    np.log(mx, out=losses.reshape(N))
    losses.reshape(N)[...] -= tgt
    if dloss is not None:
        logits /= mx[:, None]
        logits[rows, t] -= 1.0
        logits *= dloss


def crossentropy_forward(losses, logits, targets):
    """Loss only, logits left intact (eval and tests). losses (N,), logits (N, V), targets (N,)."""
    work = np.array(logits, copy=True)
    fused_classifier(losses, work, targets)
