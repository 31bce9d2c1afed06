"""Attach PP-KD capture and scoring to a loaded fairseq language model.

fairseq-eval-lm builds the model through the task, loads the checkpoint
into it, and then calls ``model(**net_input)`` followed by
``model.get_normalized_probs(..., sample=sample)`` for every batch. The task
gives the model a subclass of its own class (so parameter names, and hence
checkpoint loading, are unchanged) that

* captures the vectors the datastore needs during the forward pass: the
  input of the last decoder layer's feed-forward block (``fc1``), which is
  the kNN-LM key for pre-norm and post-norm layers alike, or the decoder's
  final hidden state, which the output layer maps to logits (a teacher
  state); and
* hands each batch's log-probabilities to a handler, which scores, dumps or
  passes them through.
"""

import torch


class PPKDModelMixin:
    """Mixin placed before a fairseq LM class; see :func:`attach`."""

    def forward(self, *args, **kwargs):
        self._ppkd_captured.clear()
        net_output = super().forward(*args, **kwargs)
        if self._ppkd_capture == "final_state" and self.decoder.adaptive_softmax is not None:
            # With an adaptive softmax the decoder returns the final states.
            self._ppkd_captured["final_state"] = net_output[0]  # (B, T, C)
        return net_output

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        handler = self._ppkd_handler
        if handler is None or sample is None or self.training:
            return super().get_normalized_probs(net_output, log_probs, sample=sample)

        def base(target_only=True):
            s = sample if target_only else None
            return super(PPKDModelMixin, self).get_normalized_probs(net_output, True, sample=s).float()

        if not log_probs:
            raise ValueError(
                "PP-KD scores one model at a time; pass a single checkpoint to --path "
                "(an ensemble asks for probabilities, not log-probabilities)"
            )
        return handler.score_batch(self, net_output, sample, base)

    def ppkd_captured(self, name, target_shape):
        """Return the captured (B, T, C) vectors, checked against the target shape."""
        if name not in self._ppkd_captured:
            raise RuntimeError(f"no {name} was captured in the forward pass")
        x = self._ppkd_captured[name]
        if x.shape[:2] != tuple(target_shape):
            raise ValueError(
                f"captured {name} has batch and time sizes {tuple(x.shape[:2])} but the target has "
                f"{tuple(target_shape)}; --softmax-batch splits batches and is not supported with PP-KD"
            )
        return x


def _last_ffn(model):
    layers = getattr(model.decoder, "layers", None)
    if not layers or not hasattr(layers[-1], "fc1"):
        raise TypeError(
            f"{type(model.decoder).__name__} has no transformer layers with a feed-forward block "
            f"(fc1); the kNN-LM key is the input of the last layer's fc1"
        )
    return layers[-1].fc1


def attach(model, handler, capture):
    """Make ``model`` capture ``capture`` vectors and score through ``handler``.

    Args:
        model: a fairseq language model (``TransformerLanguageModel``).
        handler: an object with ``score_batch(model, net_output, sample, base)``.
        capture: ``"key"`` (the last layer's FFN input) or ``"final_state"``.
    """
    if capture not in ("key", "final_state"):
        raise ValueError(f"capture must be 'key' or 'final_state', got {capture!r}")
    cls = type(model)
    if not isinstance(model, PPKDModelMixin):
        model.__class__ = type("PPKD" + cls.__name__, (PPKDModelMixin, cls), {})
    model._ppkd_handler = handler
    model._ppkd_capture = capture
    model._ppkd_captured = {}

    def store(name, transpose):
        def hook(module, inputs):
            x = inputs[0]
            model._ppkd_captured[name] = x.transpose(0, 1) if transpose else x

        return hook

    if capture == "key":
        # fc1's input is (T, B, C) inside fairseq's transformer layers.
        _last_ffn(model).register_forward_pre_hook(store("key", transpose=True))
    elif model.decoder.adaptive_softmax is None:
        projection = getattr(model.decoder, "output_projection", None)
        if projection is None:
            raise TypeError(f"{type(model.decoder).__name__} has no output_projection to read states from")
        projection.register_forward_pre_hook(store("final_state", transpose=False))
    return model
