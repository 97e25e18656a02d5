"""The five pipeline stages, one module each, each with `run(config, inputs, storage)`."""
