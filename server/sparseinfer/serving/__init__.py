"""The gRPC server: ``config`` (ServeConfig), ``batcher`` (continuous batching on the engine thread),
``convert`` (protobuf at the edge), ``servicer``, ``auth``, ``metrics``, ``logs``, ``model_setup`` and
``server`` (``start_server`` / ``serve``); ``command`` registers ``sparseinfer serve``."""
