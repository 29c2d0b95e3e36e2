"""tformer: the Transformer of "Attention Is All You Need", exact, trainable and decodable on your own data."""

__version__ = "0.1.0"
