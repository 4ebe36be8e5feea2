"""nn.Modules built on mkfast.ops, usable as drop-in layers in any PyTorch model."""
