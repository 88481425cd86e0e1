"""Speed: ``bertpre bench`` (bertpre's step against transformers') and ``bertpre gpu-check``."""
