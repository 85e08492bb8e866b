"""The stages of the Llama 2 recipe, one module per section of the paper, each driving train/ and inference/."""
