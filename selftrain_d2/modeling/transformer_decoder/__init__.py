"""(filled in by the Mask2Former work)"""
