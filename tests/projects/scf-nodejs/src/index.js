exports.main_handler = async (event, context) => event;
