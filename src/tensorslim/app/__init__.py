"""The application layer: model sources, Fashion-MNIST loaders and summary rows used by the
command line's pipelines (:mod:`tensorslim.workflows`) and the demo, the command line's
argument types, and the training of the shipped weights (:mod:`.train_shipped`)."""
