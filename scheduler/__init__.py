"""flexkv.scheduler"""
