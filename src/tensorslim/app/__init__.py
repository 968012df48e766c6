"""The application layer: model sources, Fashion-MNIST loaders and summary rows used by the
command line's pipelines (:mod:`tensorslim.workflows`) and the demo."""
