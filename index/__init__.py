"""Dense nearest-neighbour retrieval: features, patch labels, FAISS support indices, label transfer, mIoU."""
