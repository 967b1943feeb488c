"""The one exception a user sees when a checkpoint directory cannot be served.

Every problem with a checkpoint (a missing file, a tensor of the wrong shape, an architecture or activation we
do not implement, a corrupt safetensors file) is raised as ``CheckpointError`` with a message that names the
file or tensor, says what was expected and what was found, and lists what is supported. It subclasses
``ValueError`` so that callers treating bad input generically still catch it.
"""


class CheckpointError(ValueError):
    """A checkpoint (config.json, safetensors, tokenizer files) is missing, malformed or unsupported."""
