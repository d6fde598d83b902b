"""Clients of the imaging service for people: `imaging` and the euca2ools-compatible
euca-* import commands.  They use only the public API (boto3), never the service's modules."""
