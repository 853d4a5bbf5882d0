"""The core: windows, corpora, the model adapter, the datastore, FAISS indexes and search, scoring math."""
