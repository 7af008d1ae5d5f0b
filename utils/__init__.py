"""Small utilities: one-line command-line errors, atomic files, logging, meters, plots and visdom."""
