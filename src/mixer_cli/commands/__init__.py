"""One module per `mixer` command: each reads like the paper's description of its experiment and
orchestrates the layers below (train/, evaluate/, reporting/, models/, data/, config/)."""
