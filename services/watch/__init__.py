"""The watch service."""
