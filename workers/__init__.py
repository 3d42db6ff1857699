"""flexkv.workers"""
