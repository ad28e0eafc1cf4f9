"""Small clients for the systems around Metis, speaking their real protocols (reached by URL only)."""
