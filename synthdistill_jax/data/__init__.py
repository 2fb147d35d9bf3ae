"""Data: verification `.bin` reader and TFDS builders."""
