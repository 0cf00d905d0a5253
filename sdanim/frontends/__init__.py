"""The front-ends: the command line (`cli`), the browser app (`ui`) and the notebook
helpers (`notebook`). Each adds only what is its own (parsing and messages, widgets and
queueing, plotting) and calls the task floor."""
