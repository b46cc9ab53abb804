"""The two worlds and the bridge between them; see README.md in this folder."""
